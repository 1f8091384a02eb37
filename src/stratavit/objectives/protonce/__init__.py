"""PCL ProtoNCE: distributed k-means prototypes (``clustering``) and the loss (``objective``)."""
