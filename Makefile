# taps: `make demo` sets everything up and runs the embedded default; `make test` runs the suite.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CLI     := $(BIN)/taps

DATASET   ?= digits
DATA_ROOT ?= data
BACKBONE  ?= mobilenet_v2
WEIGHTS   ?= auto
TAPS      ?=
TAP       ?=
POOL      ?= avg
CLF       ?= svm
PROTOCOL  ?= auto
SEEDS     ?= 1
IMAGE_SIZE ?=
EXTRA     ?=

COMMON := --dataset $(DATASET) --data-root $(DATA_ROOT) --backbone $(BACKBONE) --weights $(WEIGHTS) \
          $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE))

.PHONY: install weights demo extract fit compare bench test test-fast lint clean

install: $(VENV)/.installed weights

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray,timm,onnx,openvino,export,track,openclip,hf,heif]'
	touch $@

weights: $(VENV)/.installed
	$(BIN)/python -m features.seed_weights

# The embedded default: scikit-learn digits through MobileNetV2 (offline weights).
demo: install
	$(CLI) extract --dataset digits --backbone mobilenet_v2 --image-size 112 --taps all --no-progress
	$(CLI) fit --dataset digits --backbone mobilenet_v2 --image-size 112 --clf logreg --protocol fraction:0.5
	$(CLI) compare --dataset digits --backbone mobilenet_v2 --image-size 112 --taps block4,block7,block11,block14,block17,pooled --clf logreg --protocol fraction:0.5

extract: install
	$(CLI) extract $(COMMON) $(if $(TAPS),--taps $(TAPS)) --pool $(POOL) $(EXTRA)

fit: install
	$(CLI) fit $(COMMON) $(if $(TAP),--tap $(TAP)) --pool $(POOL) --clf $(CLF) --protocol $(PROTOCOL) --seeds $(SEEDS) $(EXTRA)

compare: install
	$(CLI) compare $(COMMON) --taps $(or $(TAPS),all) --pool $(POOL) --clf $(CLF) --protocol $(PROTOCOL) --seeds $(SEEDS) $(EXTRA)

BENCH_ARGS ?=
bench: install
	$(CLI) bench $(if $(wildcard $(DATA_ROOT)/caltech101),--data-root $(DATA_ROOT)) $(BENCH_ARGS)

# The whole suite, with its 25 slowest tests listed (CI runs this).
test: install
	$(BIN)/python -m pytest -q --durations=25

# The fast tier for a development loop: every test not marked slow (pyproject.toml's markers:
# subprocess runs, replica processes, Ray, torch.compile, exported runtimes, the benchmark).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# ruff (pyflakes, import order, bugbear, pyupgrade, size limits) and the import-linter
# contracts of the architecture (pyproject.toml); CI runs it before the tests.
lint: $(VENV)/.installed
	$(BIN)/ruff check features pipeline tests
	$(BIN)/lint-imports

clean:
	rm -rf feature_store runs
