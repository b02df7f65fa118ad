"""Training data on disk: packed token shards (`data.shards`) and `qwen25 data pack`, which writes them from text,
jsonl and parquet inputs (`data.pack`, `data.cli`); `qwen25 data run`, the pretraining data pipeline (ingest,
filters, decontamination, dedup, model quality, mixture, pack; `data.pipeline` and the modules it names).
Loaders that turn shards into batches live in `qwen25.train.data`.
"""

from qwen25.data.shards import ShardError, ShardReader, ShardWriter, read_manifest

__all__ = ["ShardError", "ShardReader", "ShardWriter", "read_manifest"]
