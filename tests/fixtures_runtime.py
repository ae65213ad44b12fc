# fixtures for the runtime: tiny model, server process (owned by the runtime work)
