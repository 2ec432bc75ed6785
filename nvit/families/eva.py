from ..spec import Family


class EvaFamily(Family):
    name = "eva"

    @classmethod
    def matches(cls, model):
        return False
