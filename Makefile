# Two entry points for a fresh clone: `make run` (the main job on the bundled defaults)
# and `make test` (the whole test suite). Both create .venv first.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: run test venv clean

venv: .venv/.installed

# requirements-lock.txt pins every transitive version (resolution is instant and
# reproducible); torch/torchvision are installed first so pip takes the pair that
# lies on local disk instead of pulling a CUDA build from the network.
.venv/.installed: pyproject.toml requirements-lock.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements-lock.txt torch torchvision
	$(PIP) install -q -c requirements-lock.txt -e '.[dev]'
	touch $@

run: venv
	$(PY) jobs/auto_annotate.py $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf .venv
