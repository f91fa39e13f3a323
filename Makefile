# The few commands a newcomer needs. Each one sets up first (idempotent, fast when already done).
PY := .venv/bin/python

.PHONY: setup quickstart study finetune-study transfer-study test benchmark benchmark-loader benchmark-probes benchmark-cka benchmark-criticality benchmark-study benchmark-gpu tensorboard

setup:
	bash scripts/setup.sh

quickstart: setup  ## train on the embedded shapes data set through FFCV, on the CPU (~2 min)
	$(PY) cli.py fit --config configs/quickstart.yaml

study: setup  ## the embedded study: 9 objectives x 2 seeds, CKA, report in runs/embedded/report (~30 min)
	$(PY) -m study run configs/studies/embedded.yaml

finetune-study: setup  ## Table 2 on the embedded data: make study's networks fine-tuned, lr chosen per objective (~20 min)
	$(PY) -m study run configs/studies/embedded_finetune.yaml

transfer-study: setup  ## what is transferred: pre-train, P-T and RI-T fine-tuning, barriers, criticality (~20 min)
	$(PY) -m study run configs/studies/transfer.yaml

test: setup  ## the whole test suite
	$(PY) -m pytest -q

benchmark: setup  ## training-step overhead: LightningModule + FFCV vs a plain PyTorch loop
	$(PY) benchmarks/step_overhead.py

benchmark-loader: setup  ## loader img/s: FFCV data module vs FFCV's Loader vs torchvision; writer speed
	$(PY) benchmarks/loader_throughput.py

benchmark-probes: setup  ## linear-probe sweep vs scikit-learn; kNN leave-one-out time and memory
	$(PY) benchmarks/probe_speed.py

benchmark-cka: setup  ## block x block CKA: Gram matrices once per batch vs once per pair (speed-up, max difference)
	$(PY) benchmarks/cka_speed.py

benchmark-criticality: setup  ## module criticality of make transfer-study's runs: whole networks vs from the module's block
	$(PY) benchmarks/criticality_speed.py

benchmark-study: setup  ## planning Table 2's 15,768-run study: a parser per run vs one kept parser (add ARGS=--all for all)
	$(PY) benchmarks/study_planning.py $(ARGS)

benchmark-gpu: setup  ## ResNet-50 img/s on one GPU: fast path off / on / compiled, synthetic and FFCV
	$(PY) benchmarks/gpu_throughput.py --compile

tensorboard: setup
	.venv/bin/tensorboard --logdir runs
