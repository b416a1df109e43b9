from butler_mqtt.cli import main

raise SystemExit(main())
