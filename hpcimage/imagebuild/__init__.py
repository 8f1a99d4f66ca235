"""Building images: bootstrap agents write root filesystem trees."""
