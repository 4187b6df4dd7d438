"""The pipeline around the model library: distributed training of MMM4Rec (DeepSpeed
ZeRO for the dense weights, torchrec for the item tables; docs/training.md,
docs/checkpoints.md), serving, the quickstart and the ``mmm4rec`` command.

    train.py       the entry point (thin): argument parsing, exit codes
    config.py      the experiment config (typed sections, DeepSpeed JSON checks)
    env.py         launcher environment, process group, seeds, RNG state
    build.py       preflight checks and building a run (data, model config, tables, engine)
    tables.py      torchrec EmbeddingCollections: packing, sharding, fused optimizers
    engine.py      torch optimizer, LR schedule, deepspeed.initialize, precision
    model.py       the seam: table lookups -> dense engine -> loss (mmm4rec.contract.RecModel)
    trainer.py     the loop: steps, evaluation (mmm4rec.evaluate), early stopping, checkpoints, export
    checkpoint.py  atomic checkpoints on disk or fsspec URLs, safe loading
    export.py      transferable weights of a checkpoint (any ZeRO stage)
    monitor.py     tqdm, TensorBoard, CSV
    cli.py         `mmm4rec train | export | evaluate` (evaluate_cmd.py)
    main.py        the `mmm4rec` command (`python -m dist`): every package's subcommands
    quickstart.py  `mmm4rec quickstart`
    serving/       retrieval exports, items add/remove, recommend (docs/serving.md)
"""
