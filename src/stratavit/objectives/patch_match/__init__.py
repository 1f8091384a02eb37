"""Local-Global: patch correspondences across views (``matching``) and the matched-patch DINO loss (``objective``)."""
