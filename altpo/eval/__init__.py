"""Evaluation: TOFU metrics in open-unlearning's file format (``tofu`` runs a model, ``metrics``
holds the definitions) and the model's own fact-changed answers (``alternates``)."""
