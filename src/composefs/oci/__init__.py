"""OCI images: layers applied into a tree, image layouts and archives, registries."""
