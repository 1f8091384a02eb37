"""Data: image folders, named sets and tar shards (``datasets``, ``shards``), resumable sampling,
multi-crop views with per-sample geometry (``views``) and the pure box geometry they record."""
