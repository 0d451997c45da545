# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both install what they need first; a second run skips what is already there.
PY      := .venv/bin/python
STAMP   := .venv/.installed
GUEST   := .cache/guest/.ready
QEMU    := .cache/qemu/.ready

.PHONY: all test demo bench setup guest qemu clean

all: test

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

# prepare.sh needs busybox-static, cpio and patchelf, which setup.sh installs.
$(GUEST): guest/prepare.sh guest/init $(STAMP)
	bash guest/prepare.sh .cache/guest

guest: $(GUEST)

# QEMU 11 from Debian sid (TCG), a sid kernel and a busybox initramfs: the QEMU test bed.
$(QEMU): guest/prepare_qemu.sh guest/qemu_init $(STAMP)
	bash guest/prepare_qemu.sh .cache/qemu

qemu: $(QEMU)

test: $(STAMP) $(GUEST) $(QEMU)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP) $(GUEST)
	$(PY) -m guest.demo

bench: $(STAMP) $(GUEST)
	$(PY) -m bench.run

clean:
	rm -rf .venv .cache build *.egg-info
