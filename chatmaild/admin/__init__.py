"""The ``chatmaild`` admin command (``main``): config, accounts, registration, setup."""
