"""The math of the parallel layers (linear, embedding, loss, sequence parallel, packed, local forwards), eager and traced; it imports only dtp.runtime and dtp.mesh."""
