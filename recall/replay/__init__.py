"""Replay: the on-disk pool (``pool``), its leakage guard (``leakage``), the sources by name (``sources``:
BigGAN ``gan``, Flickr ``web``, a text-to-image pipeline ``diffusion``, your own ``folder``), the class mapping
of a generator (``classmap``) and the classifier it maps with, which the pretraining writes (``classifier``)."""
