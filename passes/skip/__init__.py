"""Layer skipping: find the residual stream's blocks in any graph and remove the least useful.

- `slimc.passes.skip.blocks`: residual-unit detection from the dataflow (no name matching);
- `slimc.passes.skip.score`: Block Influence and the greedy loss search;
- `slimc.passes.skip.layerskip`: the `layerskip` pass (options, rewiring, report).
"""
