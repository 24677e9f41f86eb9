"""Data: text sources (`sources`), masked-LM text (`text`) and downstream tasks (`tasks`)."""
