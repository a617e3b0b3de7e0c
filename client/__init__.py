"""The hospital side: the site trainer and its Flower ClientApp."""
