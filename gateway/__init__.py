"""The aiohttp gateway: OpenAI-compatible proxy routes and admin routes."""
