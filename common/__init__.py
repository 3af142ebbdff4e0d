"""What the five services share: configuration, database, broker, cache, HTTP, logging, metrics."""
