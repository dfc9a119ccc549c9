# Merging, Reproduced: `make book` and `make test` each set up everything they need.
#
#   make book                      execute every chapter (profile tiny) and build _build/html
#   PROFILE=vit-b-32 make book     the same with a paper profile (GPU and internet)
#   make book BOOKFLAGS="--only 01_task_arithmetic -p seed=1"   one chapter, other parameters
#   make test                      pytest -q (PYTEST_ARGS="-m 'not slow'" to skip the slow ones)
#   make clean                     remove _build/ (keeps .venv and the cache .cache/mergebook/)
#   make distclean                 also remove .venv
#
# The virtual environment is .venv; it is (re)installed when pyproject.toml or the constraints
# change, which a stamp file named after their hash records. The library declares the torch range it
# supports; constraints/cpu.txt pins the CPU wheel (torch==2.13.0) for this one pip command, so
# nothing can pull another torch here, while a GPU user's own torch is left alone.

PYTHON ?= python3
PROFILE ?= tiny
BOOKFLAGS ?=
PYTEST_ARGS ?=

VENV := .venv
VPY := $(VENV)/bin/python
PYPROJECT_HASH := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read() + open('constraints/cpu.txt', 'rb').read()).hexdigest()[:16])")
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)

.PHONY: book test venv clean distclean

book: $(STAMP)
	PROFILE=$(PROFILE) $(VPY) scripts/build_book.py $(BOOKFLAGS)

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP):
	@test -x $(VPY) || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	$(VPY) -m pip install --disable-pip-version-check -q -c constraints/cpu.txt -e '.[book,test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

clean:
	rm -rf _build

distclean: clean
	rm -rf $(VENV)
