"""Rows to packed micro-batches: TOFU splits and alternates (``tofu``), the offline demo's made-up
authors (``synthetic_authors``), which rows each optimizer step sees (``step_sampling``), and how
a step's sequences are concatenated into padding-free micro-batches (``packing``)."""
