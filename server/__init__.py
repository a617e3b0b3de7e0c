"""The coordinator side: the Flower ServerApp, its round loop and what it writes."""
