"""The REST API: thin routers over services and repositories."""

from api.deps import ApiConfig, ApiContext
from api.routes import auth, feeds, health, items, rooms, users

ROUTERS = (auth.router, users.router, items.router, rooms.router, feeds.router, health.router)

__all__ = ["ROUTERS", "ApiConfig", "ApiContext"]
