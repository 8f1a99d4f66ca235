from hpcimage.runtime.main import main

main()
