"""The prosumer process: asyncio + MQTT shell around the sans-IO protocol cores."""
