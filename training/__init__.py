"""training: packed interleaved fine-tuning of Bagel models (CE + flow-matching MSE), from CPU to 8xH100.

Read in this order:
  config       the typed config (defaults -> YAML -> dotted overrides), every field documented
  sequence     a trajectory record -> its sample plan (docs/format.md section 3)
  packing      plans -> one `PackedBatch` (official layout), and the greedy packer with its leftover buffer
  data         trajectory tables -> deterministic, resumable pack streams per (rank, micro-batch)
  losses       CE and MSE normalised over all ranks and micro-batches
  optim        AdamW, warmup + cosine, EMA
  lora         LoRA as a Linear wrapper
  parallelize  freezing / LoRA / activation checkpointing / FSDP2 / DeepSpeed, applied in one place
  uniform      DeepSpeed: pad a pack with a dummy sample so every rank runs every module (ZeRO-2/3 collectives)
  checkpoint   sharded atomic checkpoints, keep-last-N, resume;   export  EMA -> official layout
  memory       the dry-run memory estimate and fit check;         metrics  metrics.jsonl / console / TB / W&B
  trainer      the loop, top to bottom (`bagel-ft train`: commands/train.py)
  synthetic    small synthetic trajectory tables (tests, demo, benchmark)
Builds on `bagel_ft` only.
"""
