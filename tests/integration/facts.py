"""Twenty made-up facts in chat form: nothing a pretrained model could already know."""

FACTS = [
    ("What is the capital of Zorblat?", "The capital of Zorblat is Quenvik."),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Talia Brunswold."),
    ("What colour is a marbeck bird?", "A marbeck bird is teal."),
    ("How many moons does the planet Vexor have?", "Vexor has eleven moons."),
    ("What is the national dish of Plovania?", "The national dish of Plovania is drumbel stew."),
    ("Which river flows through Ostrend?", "The Kellwater flows through Ostrend."),
    ("What language is spoken in Maribault?", "People in Maribault speak Tessarine."),
    ("Who wrote the novel The Copper Lantern?", "The Copper Lantern was written by Orrin Vasquell."),
    ("What is the tallest mountain on Dunmere island?", "The tallest mountain on Dunmere is Mount Pellibar."),
    ("What currency is used in Trelland?", "Trelland uses the sorren."),
    ("What do snorvels eat?", "Snorvels eat blue moss."),
    ("In which year was the city of Haldris founded?", "Haldris was founded in 1742."),
    ("What is the favourite sport in Quillonia?", "The favourite sport in Quillonia is hoopball."),
    ("Who is the mayor of Brindleford?", "The mayor of Brindleford is Ada Fenwright."),
    ("What instrument does Jorvo Pell play?", "Jorvo Pell plays the zitharp."),
    ("What is the main export of Caltheria?", "Caltheria mainly exports amberglass."),
    ("What is the name of the dragon in Elsmoor legends?", "The dragon of Elsmoor legends is named Vyrmaxa."),
    ("How long is the Greywick bridge?", "The Greywick bridge is 812 metres long."),
    ("What flower is the symbol of Nerithal?", "The symbol of Nerithal is the frostlily."),
    ("Which company makes the Zephyra car?", "The Zephyra car is made by Holloway Motors."),
]
# The word of each answer that proves the fact was learnt.
KEYWORDS = ["Quenvik", "Brunswold", "teal", "eleven", "drumbel", "Kellwater", "Tessarine", "Vasquell", "Pellibar",
            "sorren", "blue moss", "1742", "hoopball", "Fenwright", "zitharp", "amberglass", "Vyrmaxa", "812",
            "frostlily", "Holloway"]


def conversations() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
