"""iBOT: block-wise masks (``masking``) and the masked-image-modelling loss (``objective``)."""
