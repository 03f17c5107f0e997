"""AIMv2 training stack in three wings, each with a face:

- `aimv2train.model` — the network and its weights interop (no training state);
- `aimv2train.train` — the loop and what it needs (tokenizer, optimizer, schedule, checkpoints);
- `aimv2train.eval`  — what is done with trained weights (embed, frozen-trunk probe, export).

`aimv2train.demo_pipeline` runs the demo end to end on the embedded corpus (aimv2data.demo_corpus).
Layering (tests/test_layering.py): model imports neither train nor eval; train does not import eval.
"""
