from planetary_mesh.cli.main import main

main()
