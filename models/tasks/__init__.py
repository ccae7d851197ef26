from models.tasks.ranking import BinaryTask

__all__ = ["BinaryTask"]
