"""ebbtide: raw event logs -> Delta sequences -> time-decayed interest embeddings."""

__version__ = "0.1.0"
