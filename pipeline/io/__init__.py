"""Artifact I/O: contracts (schemas, metadata), the manifest, images, the attention store, resumable parts."""
