"""`harness train`: next-token training of `gpt2-scratch` or `gpt2-hf`, with checkpoints and result rows.

The chain: parse the config -> tokenize the data -> build the model through the registry (both
implementations start from the same `Weights`) -> AdamW with warmup + cosine decay -> evaluate,
log rows, checkpoint -> final rows. Choices, stated once:

* Data. `tinyshakespeare` and any UTF-8 `PATH` are tokenized whole with GPT-2's BPE and split by
  position: the first 90% of the tokens train, the last 10% validate. `wikitext2` trains on the raw
  *valid* split and validates on the raw *test* split (the train split is not vendored), each article
  detokenized as the `ppl` task does and followed by <|endoftext|>.
* Batches. Training windows start at offsets drawn from a `torch.Generator` seeded with `seed`; its
  state is checkpointed, so a resumed run draws the same batches as an uninterrupted one. Validation
  uses the same `eval_batches` windows at every evaluation (a generator seeded with `seed + 1`).
* Weight decay applies to every parameter with two or more dimensions (the matmul weights and the
  embedding tables, `wte` being tied to the output head); biases and LayerNorm parameters are not
  decayed.
* Schedule. Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`.
* Ranks. Under `torchrun --nproc_per_node=N -m harness train` each rank takes batch_size / N rows
  of every batch the generator draws, DDP averages the gradients, rank 0 alone logs, writes rows,
  checkpoints and TensorBoard events: the same run as one process, up to float reduction order.
* Checkpoints (HF format, loadable with `GPT2LMHeadModel.from_pretrained(out)`) are written at every
  evaluation, at the end and on Ctrl-C. A non-finite loss stops training with an error and writes
  nothing, so the last good checkpoint is kept.

The modules, one job each (this package imports nothing of them, so the report plugin stays cheap):

  config.py      TrainConfig (hyperparameters), TrainRun (what and where), TrainResult; `--set` parsing
  data.py        the corpora as token ids, and the seeded batch windows
  model.py       the initial weights (random init, `--weights`, resume), dropout, the adapter to train
  checkpoint.py  HF-format checkpoints and train_state.pt
  loop.py        the optimizer, schedule and loss, and the Trainer that runs, logs rows and saves
  distributed.py torchrun: the world (rank, size), each rank's share of a batch, DDP, one voice for errors
  command.py     the `harness train` command line
  report.py      the report section for `train` rows (a registry plugin)
"""
