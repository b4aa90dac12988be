"""Data: record schema, adapters, audio loading, validation, prompts and batching, the benchmark."""
