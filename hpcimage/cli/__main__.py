"""python -m hpcimage.cli"""
from hpcimage.cli import main

main()
