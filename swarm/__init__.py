"""swarm: peer-to-peer delivery of ML model files across an inference fleet."""

__version__ = "0.1.0"
