"""Absorbed adapters taken out of genadapter and combined: a session's delta exported as a PEFT
LoRA or merged into a model folder (export.py), and sessions or LoRAs merged into one by sum,
mean, task arithmetic, TIES or DARE (merging.py). `genadapter.LoraAdapter`, `genadapter.merge`
and `genadapter.merge_sessions` come from here; `genadapter export` and `genadapter merge` run
them."""
