"""Identity adapters (installed as ``fastface.adapters``): IP-Adapter FaceID, FaceID-Plus-v2, PuLID, face analysis."""
