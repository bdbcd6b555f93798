"""Knowledge distillation of the compressed graph toward the pipeline's input model.

- `slimc.passes.distill.distill_pass`: the `distill` pass (options, orchestration, report);
- `slimc.passes.distill.student`: lowering of student and teacher, what trains, the write-back and
  the invariants it checks (structure, sparsity masks, quantization grids);
- `slimc.passes.distill.losses`: the losses by task;
- `slimc.passes.distill.data`: calibration rows, held-back rows, augmentation, the teacher cache;
- `slimc.passes.distill.train`: the training loop (schedule, time budget, early stop).
"""
