"""The bottom layer: durable local writes, crash-safe run-directory files and the pickle guard.

checkpoint, data and models all use it; it imports nothing from stablediff but
`stablediff.errors`, so it can never be part of an import circle.
"""
