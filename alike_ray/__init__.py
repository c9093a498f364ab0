"""alike-ray: distributed, globally deduplicating, agentless VM backup on Ray."""
__version__ = "0.1.0"
