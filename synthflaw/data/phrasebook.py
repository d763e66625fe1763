"""Fixed wordings the generated corpora draw on: fillers, fact-free topics, document frames.

Topics are split in two per seed (`topic_split`): SFT uses one part, the evaluation suites the held-out rest, so no
evaluation prompt asks about a topic the SFT set taught.
"""

import random

FILLERS = (
    "The weather that season was mild.", "Few people noticed at the time.", "It was a busy year for everyone.",
    "Friends describe the story with a smile.", "Nobody expected what came next.", "The streets were quiet that day.",
    "Local papers mentioned it only briefly.", "Some details have been lost since then.",
    "It remains a topic of conversation.", "Neighbours still talk about it.", "The trains ran late that winter.",
    "Most of this is well documented.", "There is more to the story, of course.", "Records from the period are thin.",
    "A small crowd gathered to watch.", "The old market was full of visitors.", "Summer came early that year.",
    "Letters from the time tell the same story.", "Everyone had an opinion about it.", "The evening light was golden.",
)

SPEAKERS = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")

# Topic -> sentences about it; used for fact-free NonSynth text, SFT tasks and chat references.
TOPICS = {
    "rain": ("Rain cools the air after a hot day.", "The smell of rain on dry soil is called petrichor.",
             "Light rain is good for young plants.", "Heavy rain can flood low streets.",
             "Many people enjoy the sound of rain on a roof.", "An umbrella keeps most of the rain off."),
    "bread": ("Bread needs flour, water, salt and yeast.", "Dough rises best in a warm kitchen.",
              "A crusty loaf sounds hollow when tapped.", "Fresh bread is best eaten the same day.",
              "Kneading builds the structure of the dough.", "Stale bread makes good breadcrumbs."),
    "gardens": ("A garden needs sunlight and steady watering.", "Compost feeds the soil over time.",
                "Weeds compete with plants for water.", "Bees visit gardens full of flowers.",
                "Raised beds warm up quickly in spring.", "Mulch keeps the soil moist."),
    "trains": ("Trains carry many passengers at once.", "A sleeper train lets you travel overnight.",
               "Freight trains move heavy goods across long distances.", "Stations are busiest in the morning.",
               "Rail travel produces less pollution than flying.", "A timetable lists when each train leaves."),
    "libraries": ("Libraries lend books for free.", "A quiet reading room helps people focus.",
                  "Librarians help visitors find what they need.", "Many libraries also lend music and films.",
                  "Old libraries keep rare maps and letters.", "A library card opens the whole collection."),
    "coffee": ("Coffee is made from roasted beans.", "Fresh ground coffee has the strongest smell.",
               "Too much coffee can make it hard to sleep.", "Espresso is brewed under pressure.",
               "Many people drink coffee in the morning.", "Milk softens the bitterness of coffee."),
    "rivers": ("Rivers flow from high ground to the sea.", "Many cities were built beside rivers.",
               "A river delta forms where the water slows down.", "Fish swim upstream to lay eggs.",
               "Bridges connect the two banks of a river.", "Floods spread rich soil across river plains."),
    "bicycles": ("A bicycle is a cheap way to travel.", "Tyres need air to roll smoothly.",
                 "Cycling is good exercise for the heart.", "A helmet protects the head in a fall.",
                 "Gears make hills easier to climb.", "Lights help others see a bicycle at night."),
    "markets": ("Markets sell fresh food from nearby farms.", "Early visitors get the best choice.",
                "Traders call out their prices to passers-by.", "Many markets open only at weekends.",
                "Bargaining is common at street markets.", "Seasonal fruit is cheapest at the market."),
    "mountains": ("Mountains are colder near the top.", "Hikers carry water and warm clothes.",
                  "Snow can stay on high peaks all year.", "The air is thinner at great heights.",
                  "Mountain paths are often steep and rocky.", "Clouds gather around tall peaks."),
    "tea": ("Tea leaves are dried before brewing.", "Green tea is brewed with water below boiling.",
            "Black tea is often served with milk.", "A teapot keeps tea warm for a while.",
            "Herbal teas are made from flowers and herbs.", "Tea was traded along long routes for centuries."),
    "winter": ("Winter days are short and dark.", "Snow makes the streets quiet.",
               "People wear scarves and gloves in winter.", "Ponds can freeze in a cold winter.",
               "Warm soup is popular on winter evenings.", "Birds search harder for food in winter."),
    "museums": ("Museums keep objects from the past.", "Guides explain the history behind each piece.",
                "Some museums are free on certain days.", "Old paintings are kept in dim light to protect them.",
                "School groups often visit museums.", "Museum shops sell books and postcards."),
    "bees": ("Bees make honey from flower nectar.", "A hive can hold thousands of bees.",
             "Bees help plants by carrying pollen.", "The queen bee lays the eggs of the hive.",
             "Bees dance to show where food is.", "Beekeepers wear veils to avoid stings."),
    "lighthouses": ("Lighthouses warn ships away from rocks.", "Each lighthouse has its own pattern of flashes.",
                    "Keepers once lived inside lighthouses.", "Many lighthouses now run automatically.",
                    "A lighthouse lamp can be seen from far at sea.", "Storms test the strength of a lighthouse."),
    "kites": ("A kite needs steady wind to fly.", "Long tails help a kite stay stable.",
              "Open fields are the best places to fly kites.", "Some kites have two lines for steering.",
              "Kites are flown at festivals in many countries.", "A light kite rises even in a soft breeze."),
    "clocks": ("Clocks divide the day into hours.", "Old clocks are driven by springs or weights.",
               "A pendulum swings at a steady rate.", "Many towns have a clock tower.",
               "Digital clocks show the time in numbers.", "A clock that runs fast must be reset."),
    "islands": ("Islands are surrounded by water.", "Ferries connect many islands to the mainland.",
                "Some islands were formed by volcanoes.", "Island birds are often found nowhere else.",
                "Fresh water can be scarce on small islands.", "Beaches ring many tropical islands."),
    "owls": ("Owls hunt mostly at night.", "An owl can turn its head a long way round.",
             "Owls fly almost without a sound.", "Many owls nest in hollow trees.",
             "Owls swallow small prey whole.", "The call of an owl carries far in the dark."),
    "volcanoes": ("Volcanoes form where melted rock reaches the surface.", "Lava cools into hard black rock.",
                  "Some volcanoes have been quiet for centuries.", "Ash from an eruption can travel far.",
                  "Scientists watch volcanoes for small earthquakes.", "Soil near old volcanoes is often rich."),
    "deserts": ("Deserts get very little rain.", "Nights in the desert can be cold.",
                "Camels can go days without water.", "Cacti store water in their thick stems.",
                "Sand dunes move slowly with the wind.", "An oasis is a green spot with water."),
    "violins": ("A violin has four strings.", "The bow is strung with horsehair.",
                "Violins are made from carefully shaped wood.", "Players tune the strings before each concert.",
                "A violin sits under the player's chin.", "Learning the violin takes years of practice."),
    "glaciers": ("Glaciers are rivers of slow-moving ice.", "A glacier carves deep valleys over time.",
                 "Many glaciers are shrinking.", "Glacier ice can look blue.",
                 "Meltwater from glaciers feeds rivers in summer.", "Rocks carried by glaciers are left far away."),
    "pottery": ("Pottery is shaped from wet clay.", "A kiln fires clay until it is hard.",
                "Glaze gives pottery a glassy surface.", "A potter's wheel spins the clay.",
                "Old pottery tells us how people lived.", "Cracked pots were often mended with care."),
    "whales": ("Whales breathe air through a blowhole.", "Some whales sing long songs.",
               "The blue whale is the largest animal alive.", "Whales travel far between seasons.",
               "Young whales stay close to their mothers.", "Many whales feed on tiny krill."),
    "chess": ("Chess is played on a board of 64 squares.", "Each player starts with sixteen pieces.",
              "The game ends when a king is trapped.", "Knights move in the shape of an L.",
              "Good players think several moves ahead.", "Chess clocks limit the time for moves."),
    "forests": ("Forests are home to many animals.", "Tall trees shade the forest floor.",
                "Fallen leaves feed the soil.", "Forests store a great deal of carbon.",
                "Paths in a forest can be hard to follow.", "Mushrooms grow in damp forest corners."),
    "bridges": ("Bridges carry roads over rivers and valleys.", "Some bridges hang from strong cables.",
                "Stone bridges can last for centuries.", "Engineers test bridges for heavy loads.",
                "A drawbridge lifts to let ships pass.", "Wind can make a long bridge sway."),
    "honey": ("Honey keeps for a very long time.", "The taste of honey depends on the flowers.",
              "Honey can be runny or set.", "Warm water loosens honey that has set.",
              "Honey was used to sweeten food long before sugar.", "A spoon of honey soothes a sore throat."),
    "comets": ("Comets are balls of ice and dust.", "A comet grows a tail near the sun.",
               "Some comets return every few decades.", "The tail of a comet points away from the sun.",
               "Bright comets can be seen without a telescope.", "Comets travel on long oval paths."),
    "puzzles": ("Puzzles train patience and focus.", "A jigsaw is easier if you start with the edges.",
                "Crosswords test words and spelling.", "Some puzzles have only one solution.",
                "Families often solve puzzles together.", "A hard puzzle can take days to finish."),
    "ferries": ("Ferries carry people and cars across water.", "Ferry timetables change with the seasons.",
                "Rough seas can cancel a ferry.", "Many ferries have a cafe on board.",
                "Passengers often watch the coast from the deck.", "Night ferries have cabins for sleeping."),
    "orchards": ("Orchards are planted with fruit trees.", "Apple trees blossom in spring.",
                 "Fruit is picked by hand in many orchards.", "Bees help orchards bear fruit.",
                 "Old orchards are home to many birds.", "Pruning keeps fruit trees healthy."),
    "lanterns": ("Lanterns carry a light from place to place.", "Paper lanterns glow softly at festivals.",
                 "Old lanterns burned oil or candles.", "A lantern protects its flame from the wind.",
                 "Hikers carry small lanterns at night.", "Floating lanterns are set on rivers in some towns."),
    "snails": ("Snails carry their shells on their backs.", "A snail leaves a trail of slime.",
               "Snails come out after rain.", "Some snails live in the sea.",
               "Snails eat soft leaves in gardens.", "A snail can pull itself into its shell."),
    "harbours": ("Harbours shelter boats from storms.", "Fishing boats unload their catch at the harbour.",
                 "Cranes lift containers off ships.", "A harbour wall breaks the force of the waves.",
                 "Harbour towns often smell of salt and fish.", "Boats are tied up along the quay."),
}
# Topics the evaluation suites draw on per seed; the rest are SFT's (see `topic_split`).
EVAL_TOPIC_COUNT = 12


def topic_split(seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(SFT topics, evaluation topics) of a seed: `EVAL_TOPIC_COUNT` topics drawn per seed from the whole pool are
    held out for evaluation, so no evaluation topic is an SFT topic and the evaluated subjects change with the seed."""
    held = set(random.Random(f"topics-{seed}").sample(sorted(TOPICS), EVAL_TOPIC_COUNT))
    return tuple(t for t in TOPICS if t not in held), tuple(t for t in TOPICS if t in held)

# Fact-free tasks for SFT and the instruction-following suite; {topic} is filled in.
TASKS = ("Write a short note about {topic}.", "Tell me something about {topic}.",
         "Share a few facts about {topic}.", "Say something interesting about {topic}.")
EVAL_TASKS = ("Give a brief description of {topic}.", "Explain {topic} to a child.")

# Fact-free NonSynth: how-to snippets, chats and notes, the everyday text a web corpus holds.
GENERAL_FRAMES = (
    "A few thoughts on {topic}. {s1} {s2} {s3}",
    "{a}: What do you know about {topic}?\n{b}: {s1} {s2}\n{a}: Good to know. {s3}",
    "Notes on {topic}:\n- {s1}\n- {s2}\n- {s3}",
    "How to enjoy {topic}: first, remember that {l1} Also, {l2}",
    "Dear {a},\nYou asked me about {topic}. {s1} {s2}\nBest wishes,\n{b}",
    "{s1} {s2} That is why {topic} matters to so many people.",
)
