"""hpcserve's own engine: a continuous-batching transformers generator behind ZeroMQ.

``server`` is the engine process, ``wire`` its documented protocol, ``client`` what a
replica (or anything else) uses to talk to it (``EngineClient``, ``EngineProcess``).
Nothing is re-exported here, so ``python -m serve_app.zmq_engine.server`` does not
import its own module twice; importing the client never imports torch.
"""
