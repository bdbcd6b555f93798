"""Unstructured and N:M weight sparsity: the mask algorithms (`masks`) and the `sparsify` pass."""
