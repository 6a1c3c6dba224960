"""The torch worker process (:mod:`.server`, started as ``python -m CTXAILib.worker``) and its Qt-free,
torch-free client (:mod:`.client`). Importing this package loads neither torch nor the engine."""
