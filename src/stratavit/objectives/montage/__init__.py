"""MCL: montages of downscaled images (``layout``), region read-out of every tile (``readout``), the loss (``objective``)."""
