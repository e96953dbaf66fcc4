"""Why was a pixel called membrane: integrated gradients of its logit and the attribution fields S_k."""
