"""Simulations of what this machine cannot reach: the toy world (Pascal VOC's stand-in), the toy generator
(BigGAN's), the web photos and the local Flickr server (Flickr's), stand-in weight files and oracle labels.

The product never imports this package (a test walks the imports): registries name its objects lazily, as
"recall.sim.<module>:<name>" references, and the `recall` command lists its commands by module name.
"""
